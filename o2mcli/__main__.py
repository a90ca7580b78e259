from o2mcli.cli import main

main()
