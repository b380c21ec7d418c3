import sys

from crane.cli import main

sys.exit(main())
