from mediagent.cli import main

main()
