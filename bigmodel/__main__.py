from bigmodel.cli.main import main

raise SystemExit(main())
