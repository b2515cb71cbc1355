from prelock.cli import main

main()
