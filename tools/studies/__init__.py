"""The studies: the representation-collapse study, the demo-settings check, the bfloat16 check."""
