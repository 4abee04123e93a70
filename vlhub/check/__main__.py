from vlhub.check.cli import cli

if __name__ == "__main__":  # spawned ranks re-import this module: they must not run the check
    cli()
