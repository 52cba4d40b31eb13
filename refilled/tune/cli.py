"""The `search` and `retrain` subcommands (Ray is imported only when they run)."""


def add_tune_commands(sub, add_config_args, config_from_args, fresh_folder) -> None:
    return None
