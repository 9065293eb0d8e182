import sys

from medtune.cli import main

sys.exit(main())
