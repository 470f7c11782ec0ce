"""What the tests share: workers and ports (distributed), models and batches, references."""
import os

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout
