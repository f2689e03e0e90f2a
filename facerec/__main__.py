from facerec.cli import main

raise SystemExit(main())
