from naics_mlflow.cli import main

# Messages and help name the installed command, which is how the docs run it.
main(prog_name="naics-embedder")
