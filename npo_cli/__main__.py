from npo_cli.cli import main

main()
