from qbridge._cli import main

raise SystemExit(main())
