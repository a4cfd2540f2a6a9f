"""`python -m accordion ...`: the same CLI as the `accordion` script."""

from accordion.cli.main import app

if __name__ == "__main__":
    app(prog_name="accordion")
