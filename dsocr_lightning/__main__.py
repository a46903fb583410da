import sys

from .preimport import import_unsloth_first


def run() -> None:
    if sys.argv[1:2] == ["export"]:  # merge an adapter: its own small CLI, no Lightning loop
        from .export import main as export_main

        export_main(sys.argv[2:])
        return
    import_unsloth_first(sys.argv[1:])  # before the CLI imports lightning, which imports transformers
    from .cli import main

    main()


try:
    run()
except Exception as error:
    from .checks import ConfigError

    if not isinstance(error, ConfigError):
        raise
    sys.exit(f"error: {error}")  # a setting or path to fix: its message, not a traceback
