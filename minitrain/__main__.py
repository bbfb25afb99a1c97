import sys

from minitrain.cli import main

sys.exit(main())
