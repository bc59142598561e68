"""Fine-tune timm models from YAML recipes on Ray Train + DeepSpeed, reading shards through DALI."""
