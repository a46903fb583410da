import sys

from .preimport import import_unsloth_first

if sys.argv[1:2] == ["export"]:  # merge an adapter: its own small CLI, no Lightning loop
    from .export import main as export_main

    export_main(sys.argv[2:])
    sys.exit(0)

import_unsloth_first(sys.argv[1:])  # before the CLI imports lightning, which imports transformers

from .cli import main

main()
