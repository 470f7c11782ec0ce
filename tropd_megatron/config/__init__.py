"""The configuration dataclasses of the Megatron side (models, layout, optimizer, rollouts),
defaults included. They import only the standard library, so that a RunConfig, ``validate``
and ``launch.plan`` work without megatron-core (or torch) on the machine."""
