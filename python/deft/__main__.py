"""`python -m deft ...` runs the CLI (also used by launchers such as `deepspeed -m deft`)."""

from deft.cli import main

if __name__ == "__main__":
    main()
