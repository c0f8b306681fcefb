"""Run the cl-ext CLI from a checkout without installing: ``python cli.py run recipes/quickstart.yaml``."""

from cl_ext.cli import main

if __name__ == "__main__":
    main()
