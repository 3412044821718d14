terraform {
  # optional() object attributes with defaults, and check blocks.
  required_version = ">= 1.5.0"

  required_providers {
    aws = {
      source = "hashicorp/aws"
      # aws_vpc_security_group_ingress_rule and the ECS arguments below exist from 5.x; 6.x
      # changed resource signatures this module has not been checked against.
      version = ">= 5.60.0, < 6.0.0"
    }
  }
}
