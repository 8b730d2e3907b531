"""`python -m anneal_operator`: run the operator with settings from ANNEAL_OPERATOR_* variables."""

from anneal_operator.main import main

raise SystemExit(main())
