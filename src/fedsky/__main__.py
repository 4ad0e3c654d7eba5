from fedsky.cli import main

main()
