"""Allow ``python -m llama_tuner``."""

from llama_tuner.cli.main import main

if __name__ == "__main__":
    main()
