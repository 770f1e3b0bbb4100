import sys

from .cli import main

if __name__ == "__main__":  # importing the module (documentation tools, doctest collection) runs nothing
    sys.exit(main())
