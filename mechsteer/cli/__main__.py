from mechsteer.cli import main

raise SystemExit(main())
