from mycoswarm.cli import main

main()
