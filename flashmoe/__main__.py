"""``python -m flashmoe``: the same as the ``flashmoe`` command."""
from flashmoe.cli import main

if __name__ == "__main__":
    main(prog_name="flashmoe")
