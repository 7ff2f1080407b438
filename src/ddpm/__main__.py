from ddpm.cli import main

raise SystemExit(main())
