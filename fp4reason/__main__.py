import sys

from fp4reason.cli import main

sys.exit(main())
