import sys

from modelavg.cli import main

sys.exit(main())
