from pyharness.cli import main

raise SystemExit(main())
