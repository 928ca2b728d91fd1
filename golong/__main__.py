import sys

from golong.cli import main

sys.exit(main())
