"""``python -m vllm_medusa.converters SRC DST ...``"""

from .cli import main

raise SystemExit(main())
