import sys

from .preimport import import_unsloth_first

import_unsloth_first(sys.argv[1:])  # before the CLI imports lightning, which imports transformers

from .cli import main

main()
