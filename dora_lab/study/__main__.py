from ..studies import main

raise SystemExit(main())
