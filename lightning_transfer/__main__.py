from lightning_transfer.cli import main

main()
