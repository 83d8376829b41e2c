import sys

from torchopt.cli import main

sys.exit(main())
