output "store_secret_arn" {
  description = "ARN of the secret holding GATEHOUSE_CA_STORE: give it to the ca serve task/pod as that environment variable."
  value       = aws_secretsmanager_secret.store.arn
}

output "rds_port" {
  description = "The PostgreSQL port taken from rds_endpoint."
  value       = local.port
}
