"""``python -m nettransplant <command> [flags]``: the ``nettransplant`` console script."""

from nettransplant.commands import console

if __name__ == "__main__":
    console()
