from recdist.cli import main

main()
