"""The vision pipeline and its models: photos in, faces (boxes, keypoints, quality, embeddings) out."""
