"""``python -m uniattn.train`` (and ``deepspeed --module uniattn.train``)."""

import sys

from .launch import main

sys.exit(main())
