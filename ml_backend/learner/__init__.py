"""The torch side: the U-Net, tiled inference, the training recipe, checkpoints (and their Redis
mirror), the pool-scoring pass and whole-volume segmentation."""
