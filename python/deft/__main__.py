"""`python -m deft ...` runs the CLI (also used by launchers: `torchrun -m deft`, `deepspeed --module deft`)."""

from deft.cli import main

if __name__ == "__main__":
    main()
