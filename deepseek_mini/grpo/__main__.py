"""``python -m deepseek_mini.grpo``: GRPO on a supervised toy checkpoint (see ``deepseek_mini.grpo.run``)."""

from deepseek_mini.grpo.run import main

raise SystemExit(main())
