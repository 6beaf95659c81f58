"""`python -m lictor.gateway -service ingress-gw ...`"""

import sys

from lictor.gateway.cli import main

sys.exit(main(sys.argv[1:]))
