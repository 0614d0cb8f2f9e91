from naics_mlflow.cli import main

main()
