"""HTTP and WebSocket server around one `Engine`: FlashLabs-compatible and OpenAI-Realtime-compatible."""
