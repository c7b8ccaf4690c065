"""dsv3.posttrain: post-training (spec 7). So far: SFT chat data (chat_data)."""
