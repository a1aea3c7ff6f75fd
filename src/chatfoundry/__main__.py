import sys

from chatfoundry.cli import main

sys.exit(main())
