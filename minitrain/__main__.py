import sys

from minitrain.commands.cli import main

sys.exit(main())
