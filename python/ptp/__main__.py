from ptp.cli import main

raise SystemExit(main())
